using System.Threading.Channels;
using Akka.Actor;

namespace Distributed.Cluster;

/// <summary>Subscribes to the coordinator's job events and hands them to non-actor code through a channel.</summary>
public sealed class JobMonitor : ReceiveActor
{
    public JobMonitor(IActorRef coordinator, ChannelWriter<JobEvent> events)
    {
        Receive<JobEvent>(e => events.TryWrite(e));
        coordinator.Tell(new SubscribeToJob(Self));
    }
}

public static class JobEvents
{
    /// <summary>The coordinator's job events, readable outside the actor system.</summary>
    public static ChannelReader<JobEvent> Subscribe(ActorSystem system, IActorRef coordinator)
    {
        var channel = Channel.CreateUnbounded<JobEvent>(new UnboundedChannelOptions { SingleReader = true });
        system.ActorOf(Props.Create(() => new JobMonitor(coordinator, channel.Writer)), "job-monitor");
        return channel.Reader;
    }
}
